import sys

from llm_mitm.cli import main

sys.exit(main())
