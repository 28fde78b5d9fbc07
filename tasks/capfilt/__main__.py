import sys

from tasks.capfilt import main

sys.exit(main())
