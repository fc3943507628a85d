"""Many data owners: federated offsite-tuning (FedAvg of adapter bundles).

    aggregate.py   one round on the owner's side: every client's adapter checked as strictly as a plug-in,
                   bad ones dropped with a reason, the rest averaged weighted by examples, the round saved
                   (aggregated adapter bundle + round.json) so rounds resume from disk

The transport (Flower's ServerApp / ClientApp) sits above this and carries only adapter tensors and
metrics; the emulator reaches data owners as a signed bundle, as in the two-party protocol.
"""
