"""Fleet operations: placement, the explained queue and its limits, host liveness, metrics.

One concept per module: ``queue`` (vocabulary), ``scheduling`` (start order and reasons),
``reasons`` (what followers are told), ``view`` and ``placement`` (where a VM can go),
``liveness`` (hosts' heartbeats), ``fleetview`` (the coordinator's view with the slots held),
``dispatcher`` (claims and starts queued migrations, announces what holds the rest),
``metrics`` (what the coordinator exports about all of it).
"""
