"""Many front doors, one scheduling view: a scheduler service front doors consult per request.

In pipeline order:

- :mod:`~gateway.scheduler_service.protocol`: the JSON shapes, and the buffer coalescing a stream's progress events;
- :mod:`~gateway.scheduler_service.client`: the front door's HTTP client towards the service;
- :mod:`~gateway.scheduler_service.remote`: :class:`RemoteDispatcher`, the front door's dispatcher placing through
  the service and falling back to local scheduling when it fails;
- :mod:`~gateway.scheduler_service.service`: the service itself (``gateway scheduler``);
- :mod:`~gateway.scheduler_service.supervisor`: ``gateway serve --workers N``, N front-door processes on one port
  and the service, supervised.
"""
