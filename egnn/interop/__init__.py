"""egnn's layers inside other packages' models (optional dependencies, imported on use):
`egnn.interop.fairchem` swaps them into fairchem's eSCN-MD / UMA backbones and back."""
