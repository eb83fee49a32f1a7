import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(__file__))  # test helpers (toy_lm, ...) import by name
warnings.filterwarnings("ignore", message="No ccache found")
