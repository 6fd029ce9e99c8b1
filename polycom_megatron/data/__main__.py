import sys

from polycom_megatron.data.cli import main

sys.exit(main())
