"""Verifies a Plinth access token with PyJWT against Plinth's published JWKS.

Usage: verify_jwt.py JWKS_FILE TOKEN_FILE
Prints the claims as JSON; exits non-zero if the token does not verify, or if
PyJWT would accept it for the wrong audience.
"""
import json
import sys

import jwt

jwks = jwt.PyJWKSet.from_dict(json.load(open(sys.argv[1])))
token = open(sys.argv[2]).read().strip()
header = jwt.get_unverified_header(token)
assert header["alg"] == "EdDSA" and header["typ"] == "at+jwt", header
key = next(k for k in jwks.keys if k.key_id == header["kid"])
claims = jwt.decode(token, key=key.key, algorithms=["EdDSA"], audience="plinth", issuer="plinth")
try:
    jwt.decode(token, key=key.key, algorithms=["EdDSA"], audience="someone-else", issuer="plinth")
    sys.exit("accepted with the wrong audience")
except jwt.InvalidAudienceError:
    pass
print(json.dumps(claims))
