"""The agent registry: agent files and their config, the routing chain, 0.20.1 compatibility.

The bottom of the data path: it knows nothing of Redis or LiveKit rooms. The offline
providers (:mod:`~openrtc.agents.offline`, :mod:`~openrtc.agents.tone_tts`) live here
because the registry serves them as provider strings.
"""
