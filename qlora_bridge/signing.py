"""Signing and verifying export folders in the OpenSSF model-signing format, offline, with an EC P-256 key.

The signature (`model.sig`, a Sigstore bundle over an in-toto statement of every file's sha256) covers the whole
folder, manifest included, so the community's own `model_signing verify key` accepts what we sign. `verify`
adds our own checks on top: the manifest's digests and sizes, and that its paths stay inside the folder.
"""

from __future__ import annotations

import ast
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from . import manifest as mf
from .errors import BridgeError


def keygen(prefix: Path, passphrase: bytes | None = None, force: bool = False) -> tuple[Path, Path]:
    """Write PREFIX.pem (private, mode 0600, encrypted if a passphrase is given) and PREFIX.pub."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    private, public = Path(f"{prefix}.pem"), Path(f"{prefix}.pub")
    for p in (private, public):
        if p.exists() and not force:
            raise BridgeError("the key file already exists", file=p, fix="choose another --out, or pass --force")
    private.parent.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    enc = serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)
    private.unlink(missing_ok=True)
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def _hashing_config():
    from model_signing import hashing

    # the signature lives inside the folder it signs; the model_signing CLI ignores it the same way
    return hashing.Config().set_ignored_paths(paths=[mf.SIGNATURE], ignore_git_paths=True)


def sign(folder: Path, private_key: Path, passphrase: bytes | None = None, manifest: dict | None = None) -> Path:
    """Sign the folder (OpenSSF model-signing) once its manifest is valid and its files match it. manifest: the
    folder's, where the caller holds it as written."""
    import model_signing

    folder, private_key = Path(folder), Path(private_key)
    if not private_key.is_file():
        raise BridgeError("private key not found", file=private_key, fix="create one with `qlora-bridge keygen`")
    manifest = manifest if manifest is not None else mf.read(folder)
    problems = mf.schema_errors(manifest) + [f"a path outside the folder: {p}" for p in mf.unsafe_paths(manifest)]
    if problems:  # a signature would vouch for it: the community verifier checks digests, not our schema
        raise BridgeError(f"the manifest is not valid, so the folder is not signed: {problems[0]}",
                          file=folder / mf.MANIFEST, fix="re-export the folder with `qlora-bridge export`")
    links = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_symlink())
    if links:  # model_signing refuses them with a message that reads like a key problem
        raise BridgeError(f"the folder holds a symbolic link ({', '.join(links[:3])}), so it is not signed",
                          file=folder / links[0], fix="replace each link with a copy of the file it points to")
    differences = mf.compare_outputs(folder, manifest)[0]
    if differences:  # the community verifier checks the files against the signature only: it would accept them
        raise BridgeError("the folder does not match its manifest, so it is not signed: " + "; ".join(differences),
                          file=folder / mf.MANIFEST, fix="re-export the folder, or restore the files the manifest "
                          "describes (`qlora-bridge verify` lists every difference)")
    sig = folder / mf.SIGNATURE
    try:
        (model_signing.signing.Config()
         .use_elliptic_key_signer(private_key=private_key, password=passphrase)
         .set_hashing_config(_hashing_config())
         .sign(folder, sig))
    except (TypeError, ValueError) as e:
        detail = str(e) or type(e).__name__
        fix = ("pass the key's passphrase (--passphrase-env VAR)" if "password" in detail.lower() or "decrypt" in
               detail.lower() else "use an EC P-256/P-384/P-521 PEM key made by `qlora-bridge keygen`")
        raise BridgeError(f"cannot sign with this key: {detail}", file=private_key, fix=fix) from None
    return sig


@dataclass
class Verdict:
    folder: Path
    problems: list[str] = field(default_factory=list)
    files_checked: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def _explain(message: str) -> list[str]:
    """model_signing's failure text turned into one plain sentence per problem."""
    if not message.strip():
        return ["the signature does not match its signed statement: the signature file was edited or forged"]
    if "Key mismatch" in message:
        return ["wrong key: the signature was not made with the private key of this public key"]
    out = []
    inner = re.search(r"Signature mismatch: (\[.*\])\s*$", message, re.S)
    items = ast.literal_eval(inner.group(1)) if inner else [message]
    for item in items:
        if m := re.match(r"Hash mismatch for '(.+?)'", item):
            out.append(f"changed file: {m.group(1)} differs from the signed digest")
        elif m := re.match(r"Extra files found in model '.*?': (.+)", item):
            out += [f"added file: {f.strip()} is not covered by the signature" for f in m.group(1).split(",")]
        elif m := re.match(r"Missing files in model '.*?': (.+)", item):
            out += [f"removed or renamed file: {f.strip()} is signed but missing" for f in m.group(1).split(",")]
        else:
            out.append(item)
    return out


def _check_public_key(public_key: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    fix = "pass the .pub file that `qlora-bridge keygen` wrote beside the private key"
    if not public_key.is_file():
        raise BridgeError("public key not found", file=public_key, field="--public-key", fix=fix)
    pem = public_key.read_bytes()
    if b"PRIVATE KEY" in pem:
        raise BridgeError("this is a private key; verifying takes the public one (and the private key should not "
                          "leave the signer)", file=public_key, field="--public-key", fix=fix)
    try:
        serialization.load_pem_public_key(pem)
    except (ValueError, TypeError) as e:
        raise BridgeError(f"not a PEM public key ({e})", file=public_key, field="--public-key", fix=fix) from None


def _bundle_damage(sig: Path) -> str | None:
    """Why the signature file cannot be a Sigstore bundle at all (empty, cut short, not JSON), or None."""
    text = sig.read_bytes()
    if not text.strip():
        return "is empty"
    try:
        bundle = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return f"is not a complete JSON bundle (cut short or overwritten: {e})"
    return None if isinstance(bundle, dict) else "is not a signature bundle"


def verify(folder: Path, public_key: Path) -> Verdict:
    """Check the signature and the manifest; every problem found is named, none is an empty message."""
    import model_signing

    folder, public_key = Path(folder), Path(public_key)
    verdict = Verdict(folder)
    if not folder.is_dir():
        raise BridgeError("not a folder", file=folder, fix="pass an export folder")
    _check_public_key(public_key)
    sig = folder / mf.SIGNATURE
    if not sig.is_file():
        verdict.problems.append(f"missing signature: {mf.SIGNATURE} is not in the folder (sign it with "
                                "`qlora-bridge sign`)")
    elif damage := _bundle_damage(sig):
        verdict.problems.append(f"damaged signature: {mf.SIGNATURE} {damage} (re-sign the folder with "
                                "`qlora-bridge sign` if its files are the ones you trust)")
    else:
        try:
            (model_signing.verifying.Config().use_elliptic_key_verifier(public_key=public_key)
             .set_hashing_config(_hashing_config()).verify(folder, sig))
        except Exception as e:  # model_signing raises ValueError, cryptography InvalidSignature, json errors
            verdict.problems += _explain(str(e))
    try:
        manifest = mf.read(folder)
    except BridgeError as e:
        verdict.problems.append(e.problem)
        return verdict
    verdict.problems += [f"manifest schema: {e}" for e in mf.schema_errors(manifest)]
    problems, present = mf.compare_outputs(folder, manifest)
    verdict.problems += problems
    verdict.files_checked = len(present)
    return verdict
