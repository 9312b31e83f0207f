"""``python -m openrtc``: the same as the ``openrtc`` command."""

from openrtc.cli.main import main

main()
