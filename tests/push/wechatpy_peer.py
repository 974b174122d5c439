"""An independent WXBizMsgCrypt: wechatpy's `wechatpy.crypto` signs and encrypts
pushes the way WeChat does, and decrypts what the service encrypts.

Driven by tests/api/push_peer.rs through wechatpy_peer.sh (which pins wechatpy in a
virtualenv). Reads one JSON request on stdin, writes one JSON answer on stdout:

  {"mode": "encrypt", "token", "key", "appid",
   "pushes": [{"format": "xml"|"json", "plain": "<xml>…</xml>" | "{…}",
               "timestamp", "nonce"}]}
  → [{"query": {"signature", "timestamp", "nonce", "encrypt_type", "msg_signature"},
      "body": "…"}]

  {"mode": "decrypt", "token", "key", "appid",
   "items": [{"encrypt", "msg_signature", "timestamp", "nonce"}]}
  → ["plaintext", …]   (wechatpy raises on a bad signature or appid: exit status 1)
"""
import json
import sys

import xmltodict
from wechatpy.crypto import WeChatCrypto
from wechatpy.utils import WeChatSigner


def signature(*parts):
    signer = WeChatSigner()
    signer.add_data(*parts)
    return signer.signature


def encrypt(req):
    crypto = WeChatCrypto(req["token"], req["key"], req["appid"])
    out = []
    for push in req["pushes"]:
        ts, nonce = push["timestamp"], push["nonce"]
        # wechatpy's own envelope: <Encrypt>, <MsgSignature>, <TimeStamp>, <Nonce>.
        envelope = crypto.encrypt_message(push["plain"], nonce, ts)
        fields = xmltodict.parse(envelope)["xml"]
        encrypted, msg_signature = fields["Encrypt"], fields["MsgSignature"]
        if push["format"] == "xml":
            body = envelope
        else:
            body = json.dumps({"ToUserName": "gh_peer", "Encrypt": encrypted})
        out.append({
            "query": {
                "signature": signature(req["token"], ts, nonce),
                "timestamp": ts,
                "nonce": nonce,
                "openid": "peer",
                "encrypt_type": "aes",
                "msg_signature": msg_signature,
            },
            "body": body,
        })
    return out


def decrypt(req):
    crypto = WeChatCrypto(req["token"], req["key"], req["appid"])
    out = []
    for item in req["items"]:
        plain = crypto.decrypt_message({"Encrypt": item["encrypt"]}, item["msg_signature"],
                                       item["timestamp"], item["nonce"])
        out.append(plain.decode("utf-8") if isinstance(plain, bytes) else plain)
    return out


def main():
    req = json.load(sys.stdin)
    mode = req["mode"]
    if mode == "encrypt":
        answer = encrypt(req)
    elif mode == "decrypt":
        answer = decrypt(req)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    json.dump(answer, sys.stdout)


if __name__ == "__main__":
    main()
