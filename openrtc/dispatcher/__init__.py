"""The dispatcher: LiveKit's offers answered (availability, admission), each job routed and
enqueued (assignment, enqueuer, ledger), statuses relayed (relay), lost jobs re-dispatched
(leader, reconciler); parts started from one list in :mod:`openrtc.dispatcher.dispatcher`."""
