"""``python -m hisynseg`` runs the command-line interface."""

from hisynseg.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
