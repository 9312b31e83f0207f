"""The worker: reads its agent's stream, decides each claim (acceptance, spread by load),
runs the sessions and reports their outcome."""
