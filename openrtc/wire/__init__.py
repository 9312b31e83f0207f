"""What travels on the wire: job/control entries and records, key names, signatures.

Pure encoding and decoding (no I/O); every key in :mod:`~openrtc.wire.keys`.
"""
