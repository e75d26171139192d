"""The Flower-free server side: the round core and its side protocols.

:class:`~lora_flwr.server.core.RoundCore` owns the server state, the rule, the
server optimizer and the guards, and answers in values: the plan and payload for
each sampled partition, and the outcome of a round's replies.
:mod:`lora_flwr.fl.strategy` translates between it and Flower. Side protocols
plug in as hooks (:mod:`.hooks`: DP, SecAgg+) or as modules the core calls
(:mod:`.head`, :mod:`.evaluation`). :mod:`.record` holds the typed history row.

Nothing is imported here, so that reading a history row (``.record``) stays
free of numpy and of the rest of the server.
"""
