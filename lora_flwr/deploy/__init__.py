"""Run the Flower app on real Flower processes of this machine, and stop them after.

Flower is driven through its executables (``flower-superlink``,
``flower-supernode``, ``flwr``), never imported, so nothing here needs ``flwr`` in
the call path. One job per module, lowest first:

* :mod:`~lora_flwr.deploy.errors`: the one error a failed deployment raises;
* :mod:`~lora_flwr.deploy.cpus`: CPU lists (``0,2-3``) for pinning;
* :mod:`~lora_flwr.deploy.processes`: start, pin, watch and stop child processes;
* :mod:`~lora_flwr.deploy.credentials`: TLS certificates and SuperNode keys;
* :mod:`~lora_flwr.deploy.run_config`: the experiment as ``flwr run`` reads it;
* :mod:`~lora_flwr.deploy.cli`: ``flwr`` CLI calls and the wait for a run;
* :mod:`~lora_flwr.deploy.commands`: the SuperLink and SuperNode command lines;
* :mod:`~lora_flwr.deploy.outcome`: whether a finished run completed and wrote
  every round;
* :mod:`~lora_flwr.deploy.local`: one SuperLink and N SuperNodes on loopback;
* :mod:`~lora_flwr.deploy.local_sim`: ``flwr run`` on a private local SuperLink in
  simulation mode;
* :mod:`~lora_flwr.deploy.options`: the launchers' command-line options and exit
  codes.
"""
