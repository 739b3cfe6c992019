"""`python -m qlora_kit` == the `qlora-kit` console script."""
from .cli import main

raise SystemExit(main())
