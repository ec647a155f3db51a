"""Sub-commands of ``ocixfs``; see ``ocixfs.cli`` for the contract each module follows."""
