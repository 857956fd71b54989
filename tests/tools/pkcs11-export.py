#!/usr/bin/python3
"""Tries to get a private key out of a PKCS#11 token, as an attacker
with the PIN would: read its value (C_GetAttributeValue of CKA_VALUE),
then wrap it under a fresh AES key (C_WrapKey). Uses PyKCS11 (Debian's
python3-pykcs11), a binding independent of Twofold's.

Usage: pkcs11-export.py MODULE TOKEN-LABEL KEY-LABEL PIN-FILE
Prints what the token answered to each. Exit status: 0 if the token
refused both, 1 if any key material came out, 2 if the key was not
found or the token could not be opened.
"""
import sys

import PyKCS11
from PyKCS11 import LowLevel as LL


def main():
    module, token, label, pin_file = sys.argv[1:5]
    with open(pin_file) as f:
        pin = f.read().rstrip("\r\n")
    lib = PyKCS11.PyKCS11Lib()
    lib.load(module)
    slot = next(
        (s for s in lib.getSlotList(tokenPresent=True)
         if lib.getTokenInfo(s).label.strip() == token),
        None,
    )
    if slot is None:
        print(f"no token {token!r}")
        return 2
    session = lib.openSession(slot, PyKCS11.CKF_SERIAL_SESSION | PyKCS11.CKF_RW_SESSION)
    session.login(pin)
    keys = session.findObjects([
        (PyKCS11.CKA_CLASS, PyKCS11.CKO_PRIVATE_KEY),
        (PyKCS11.CKA_LABEL, label),
    ])
    if not keys:
        print(f"no private key {label!r}")
        return 2
    leaked = False
    for key in keys:
        try:
            value = session.getAttributeValue(key, [PyKCS11.CKA_VALUE])[0]
            if value:
                print(f"value: READ ({len(value)} bytes)")
                leaked = True
            else:
                print("value: refused (no value given)")
        except PyKCS11.PyKCS11Error as e:
            print(f"value: refused ({PyKCS11.CKR[e.value]})")
        try:
            wrapping = session.generateKey([
                (PyKCS11.CKA_CLASS, PyKCS11.CKO_SECRET_KEY),
                (PyKCS11.CKA_KEY_TYPE, PyKCS11.CKK_AES),
                (PyKCS11.CKA_VALUE_LEN, 32),
                (PyKCS11.CKA_TOKEN, False),
                (PyKCS11.CKA_WRAP, True),
                (PyKCS11.CKA_ENCRYPT, True),
            ], PyKCS11.Mechanism(PyKCS11.CKM_AES_KEY_GEN, None))
        except PyKCS11.PyKCS11Error as e:
            # A TPM's module makes no session keys: nothing to wrap with.
            print(f"wrap: impossible (no wrapping key: {PyKCS11.CKR[e.value]})")
            continue
        try:
            wrapped = session.wrapKey(
                wrapping, key, PyKCS11.Mechanism(PyKCS11.CKM_AES_KEY_WRAP_PAD, None))
            print(f"wrap: WRAPPED ({len(wrapped)} bytes)")
            leaked = True
        except PyKCS11.PyKCS11Error as e:
            print(f"wrap: refused ({PyKCS11.CKR[e.value]})")
        session.destroyObject(wrapping)
    session.logout()
    return 1 if leaked else 0


if __name__ == "__main__":
    sys.exit(main())
