"""placeholder"""

SAMPLERS = {}
