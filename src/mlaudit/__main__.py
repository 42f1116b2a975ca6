"""``python -m mlaudit``: the same command line as the ``mlaudit`` script."""

from .cli import main

if __name__ == "__main__":
    main()
