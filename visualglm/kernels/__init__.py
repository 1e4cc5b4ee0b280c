"""Module swaps that pick faster kernels for a built model (they change no results beyond rounding)."""
