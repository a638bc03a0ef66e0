"""``python -m lightning_nft`` runs the ``lightning-nft`` CLI."""

from lightning_nft.cli import main

if __name__ == "__main__":
    main()
