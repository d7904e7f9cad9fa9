"""dcn-experiments: does swapping regular for deformable convolutions pay off on your task and data?"""

__version__ = "0.1.0"
