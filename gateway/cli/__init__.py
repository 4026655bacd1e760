"""The ``gateway`` command line: the group and its commands, one module each (``serve``, ``scheduler``, ``mock-engine``,
``bench``, ``simulate``, ``stack``); the options several commands share are in :mod:`gateway.cli.options`, the
engine-model options of ``mock-engine`` and ``simulate`` in :mod:`gateway.cli.engine_options`."""

from __future__ import annotations

import click

from gateway.cli.bench import bench
from gateway.cli.mock_engine import mock_engine
from gateway.cli.scheduler import scheduler
from gateway.cli.serve import serve
from gateway.cli.simulate import simulate
from gateway.cli.stack import stack


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="sbs-gateway")
def main() -> None:
    """OpenAI-compatible routing gateway with staggered batch scheduling over SGLang/vLLM DP ranks.

    \b
    Quick start:
      gateway serve                                    embedded simulated engines, http://127.0.0.1:8000/v1
      gateway serve --pd sglang                        the same, as a P/D disaggregated prefill + decode pair
      gateway serve --workers 2                        two front-door processes sharing a scheduler service
      gateway serve --config gateway.yaml              in front of your SGLang/vLLM engines
      gateway stack                                    engines + gateway + Prometheus on loopback (from a clone)
      gateway bench --url http://127.0.0.1:8000 --trace azure-conv --duration 60
      gateway simulate --trace azure-conv --duration 600 --plot policies.png
      gateway simulate --trace azure-conv --duration 600 --prefill-pool 2x8 --decode-pool 1x16

    Every command's options: gateway COMMAND --help. Settings: README "Configuration reference".
    """


for command in (serve, scheduler, mock_engine, bench, simulate, stack):
    main.add_command(command)
