"""The name rule for fleets, devices, users, proxies and roles: pure core.

One DNS-label-like rule (lowercase letters, digits and ``-``, 1–63 characters, a letter or digit
at both ends) so a name fits a certificate's SPIFFE URI, a DNS name and a file name alike. The
certificate code (:func:`enroll.certs.check_name`) and the role parser both apply it; it lives
here so that the pure role evaluation does not load the certificate code to read a regex.
"""

from __future__ import annotations

import re

#: whole-string match only (:func:`is_name`): ``^…$`` alone would let a trailing newline through
NAME_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
NAME_RULE = "1-63 lowercase letters, digits and '-', starting and ending with a letter or digit"


def is_name(text: object) -> bool:
    """Does ``text`` follow the name rule? (Not a str: no.)"""
    return isinstance(text, str) and NAME_RE.fullmatch(text) is not None
