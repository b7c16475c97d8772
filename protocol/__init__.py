"""Wire and on-disk formats of swarmtune: contribution records, peer ids, the gRPC control API.

Nothing here imports from `node/`: a verifier needs only this package and `cryptography`.
"""
