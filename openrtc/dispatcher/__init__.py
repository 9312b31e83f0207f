"""The dispatcher: answers LiveKit's availability requests (admission), routes each job
and enqueues it (enqueuer, ledger), relays statuses, re-dispatches lost jobs (reconciler)."""
