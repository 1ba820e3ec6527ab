"""flatd: master flats from each night's flat frames, with nobody at the keyboard."""

__version__ = "0.1.0"
