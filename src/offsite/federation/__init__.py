"""Many data owners: federated offsite-tuning (FedAvg of adapter bundles) on the Flower engine.

    aggregate.py   one round on the owner's side: every client's adapter checked as strictly as a plug-in,
                   bad ones dropped with a reason, the rest averaged weighted by examples, the round saved
                   (aggregated adapter bundle + round.json) so rounds resume from disk
    configs.py     the two sides' settings (torch- and Flower-free: the CLI's flags come from them)
    wire.py        adapter bundles through Flower: each file verbatim as a byte Array of an ArrayRecord
    apps.py        Flower's ServerApp (the rounds) and ClientApp (one data owner's round of training)
    launch.py      `offsite federate server|client`: flower-superlink + flwr run, flower-supernode
    commands.py    the CLI's federate command

Flower carries only adapter bundles and metrics; the emulator reaches data owners as a signed bundle,
as in the two-party protocol. Modules above aggregate.py need the `federate` extra (flwr).
"""
