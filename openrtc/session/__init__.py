"""The livekit-agents seam: one session, the runners that host it (in-process or a
child process) and the child itself."""
