"""libp2p adapters: the host and encrypted lease channels."""
