import os
import sys

# tests import the shared toy model as `toy`
sys.path.insert(0, os.path.dirname(__file__))
