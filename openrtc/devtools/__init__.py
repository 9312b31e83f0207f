"""Development tools: real servers on free ports, ``openrtc dev``, the all-in-one process,
a test caller, a stand-in LiveKit ``/agent`` endpoint for fault injection."""
