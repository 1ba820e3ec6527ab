"""Output: from a master array to a file.

`naming` makes output names from templates, safe (pure); `masters` builds the master
header and writes it atomically (FITS, .fits.fz).
"""
