"""structattn: structured-matrix attention (BTT, MLR, MLBTC) and scaling-law studies."""

__version__ = "0.1.0"
