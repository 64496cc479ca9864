"""`python -m zenjax.serve [--checkpoint DIR] [--port 50051] ...`: see zenjax/serve/server.py."""
import sys

from zenjax.serve.server import main

if __name__ == "__main__":
    sys.exit(main())
