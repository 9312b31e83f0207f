"""What the benchmarks share, one module per concern.

* :mod:`_lib.stats`: percentiles and medians, one definition for every figure;
* :mod:`_lib.procs`: the one service spawner (:class:`~_lib.procs.ServiceProcess`)
  and the one ``/proc`` sampler (CPU of a process, its threads, the machine; RSS
  and PSS of a process tree);
* :mod:`_lib.tokens`: a caller's LiveKit access token;
* :mod:`_lib.figures`: headline figures for ``bench/scoreboard.py``;
* :mod:`_lib.corpus`: the routing corpus, quiet logging and gc-off timing that
  ``bench/routing.py`` and its 0.20.1 child share.

A benchmark imports these as ``_lib.<module>`` with ``bench/`` on ``sys.path``
(it is when a script runs as ``python bench/<name>.py``). Nothing here imports
``openrtc``: ``bench/_routing_legacy.py`` imports :mod:`_lib.corpus` in a venv
whose ``openrtc`` is another package.
"""
