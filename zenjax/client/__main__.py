"""`python -m zenjax.client "prompt" | --file F | - [--chat] [--server host:port]`: see zenjax/client/cli.py."""
import sys

from zenjax.client.cli import main

if __name__ == "__main__":
    sys.exit(main())
