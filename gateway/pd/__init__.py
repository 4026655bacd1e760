"""P/D disaggregation: how one request is split into a prefill leg and a decode leg, per engine protocol.

Pure: each protocol module turns a client's request body and the chosen prefill and decode DP ranks into the two
legs' bodies and headers (and, for a protocol whose decode leg needs the prefill's answer, builds the decode leg
from it). No I/O here; the relay that sends the legs, cancels one when the other fails and streams the answer is
the front door's.

- :mod:`.legs`: the vocabulary (:class:`~.legs.Leg`, :class:`~.legs.PrefillSide`, :class:`~.legs.DecodeSide`,
  :class:`~.legs.PdAttempt`, :class:`~.legs.PdProtocolError`).
- :mod:`.sglang_bootstrap`: SGLang's bootstrap protocol, both legs at once with a fresh room per attempt.
- :mod:`.vllm_nixl`: vLLM's NixlConnector, prefill first, decode with the ``kv_transfer_params`` it returns.
- :mod:`.vllm_mooncake`: vLLM's MooncakeConnector, both legs at once with a gateway-minted ``transfer_id``.

Sources for every field are in each module's docstring (checked against SGLang 0.5.23, vLLM 0.34 and the SGLang
Model Gateway); ``docs/design.md`` §4.4 summarises them.
"""

from __future__ import annotations

from gateway.pd.legs import DecodeSide, Leg, PdAttempt, PdProtocolError, PrefillSide

__all__ = ["DecodeSide", "Leg", "PdAttempt", "PdProtocolError", "PrefillSide"]
