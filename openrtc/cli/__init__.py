"""The ``openrtc`` command: :mod:`~openrtc.cli.app` (the root group and what commands share),
a module per command group, and :mod:`~openrtc.cli.main` that registers them all."""
