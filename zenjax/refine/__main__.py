"""python -m zenjax.refine: see zenjax/refine/__init__.py."""
from zenjax.refine import main

raise SystemExit(main())
