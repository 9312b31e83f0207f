"""The ``openrtc`` command (:mod:`~openrtc.cli.main`)."""
