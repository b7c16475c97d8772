"""Wire and on-disk formats of swarmtune: contribution records, round receipts and spot checks,
peer ids, the gRPC control API.

Nothing here imports from `node/`: a verifier needs only this package and `cryptography`.
"""
