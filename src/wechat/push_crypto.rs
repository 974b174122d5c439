//! WeChat's message-push crypto, as its sample implementation WXBizMsgCrypt does it
//! (WECHAT.md §6): the SHA-1 signatures over the sorted strings, and AES-256-CBC
//! with IV = the key's first 16 bytes, PKCS#7 padding to a multiple of 32 bytes,
//! and the plaintext `16 random bytes ‖ u32 BE length ‖ message ‖ appid`.
//!
//! Plain logic: no HTTP, no database. Every malformed input is a typed
//! [`PushCryptoError`], never a panic: a push is attacker-controlled until its
//! signature is checked, and the ciphertext is checked only after that.

use aes::cipher::block_padding::NoPadding;
use aes::cipher::{BlockDecryptMut, BlockEncryptMut, KeyIvInit};
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use base64::engine::DecodePaddingMode;
use base64::Engine;
use sha1::{Digest, Sha1};
use subtle::ConstantTimeEq;

type Encryptor = cbc::Encryptor<aes::Aes256>;
type Decryptor = cbc::Decryptor<aes::Aes256>;

/// Length of an EncodingAESKey as the mini-program console shows it.
pub const ENCODING_AES_KEY_LEN: usize = 43;
/// WXBizMsgCrypt pads to this, not to AES's 16-byte block.
const PAD_BLOCK: usize = 32;
/// Random prefix of every plaintext.
const RANDOM_LEN: usize = 16;

/// Why a push could not be decrypted (or a key not read). None of these says
/// anything about the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PushCryptoError {
    #[error("the EncodingAESKey is not 43 base64 characters")]
    BadKey,
    #[error("the ciphertext is not base64")]
    Base64,
    #[error("the ciphertext is not a whole number of 32-byte blocks")]
    BlockLength,
    #[error("the decrypted text has no valid PKCS#7 padding")]
    Padding,
    #[error("the decrypted text is shorter than its length field says")]
    Truncated,
    #[error("the appid inside the ciphertext is not this app's")]
    WrongAppId,
}

/// The AES key of one app: Base64-decode(EncodingAESKey + "="), 32 bytes.
#[derive(Clone)]
pub struct PushKey([u8; 32]);

impl std::fmt::Debug for PushKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PushKey(…)")
    }
}

/// The EncodingAESKey's 43 characters carry 258 bits for 256: WeChat's keys (its
/// own sample's among them) leave the last two bits set, so they must be allowed.
const KEY_BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_decode_allow_trailing_bits(true)
        .with_decode_padding_mode(DecodePaddingMode::RequireCanonical),
);

impl PushKey {
    /// Reads an EncodingAESKey: exactly 43 characters of the base64 alphabet.
    pub fn from_encoding_aes_key(key: &str) -> Result<PushKey, PushCryptoError> {
        let alphabet = |b: u8| b.is_ascii_alphanumeric() || b == b'+' || b == b'/';
        if key.len() != ENCODING_AES_KEY_LEN || !key.bytes().all(alphabet) {
            return Err(PushCryptoError::BadKey);
        }
        let bytes = KEY_BASE64
            .decode(format!("{key}="))
            .map_err(|_| PushCryptoError::BadKey)?;
        let key: [u8; 32] = bytes.try_into().map_err(|_| PushCryptoError::BadKey)?;
        Ok(PushKey(key))
    }

    fn iv(&self) -> &[u8] {
        &self.0[..16]
    }
}

/// WeChat's signature: hex SHA-1 of the strings sorted and concatenated. The URL
/// check and plaintext pushes sign (token, timestamp, nonce); safe mode's
/// `msg_signature` adds the `Encrypt` string.
pub fn signature(parts: &[&str]) -> String {
    let mut sorted = parts.to_vec();
    sorted.sort_unstable();
    let mut sha = Sha1::new();
    for part in sorted {
        sha.update(part.as_bytes());
    }
    sha.finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>()
}

/// Whether `given` is the signature of `parts`, compared in constant time (any
/// hex case; a wrong length is simply unequal).
pub fn verify_signature(given: &str, parts: &[&str]) -> bool {
    let expected = signature(parts);
    let given = given.to_ascii_lowercase();
    bool::from(expected.as_bytes().ct_eq(given.as_bytes()))
}

/// Encrypts `message` for `appid` as WeChat does; `random` is the 16-byte prefix
/// (fresh random bytes in real use; fixed in tests). Returns the base64 `Encrypt`.
pub fn encrypt(key: &PushKey, message: &[u8], appid: &str, random: [u8; 16]) -> String {
    let mut plain = Vec::with_capacity(RANDOM_LEN + 4 + message.len() + appid.len() + PAD_BLOCK);
    plain.extend_from_slice(&random);
    // A push body is far below 4 GiB (the HTTP limit is 64 KiB).
    let len = u32::try_from(message.len()).unwrap_or(u32::MAX);
    plain.extend_from_slice(&len.to_be_bytes());
    plain.extend_from_slice(message);
    plain.extend_from_slice(appid.as_bytes());
    let pad = PAD_BLOCK - plain.len() % PAD_BLOCK;
    // pad is 1..=32: fits a byte.
    plain.resize(plain.len() + pad, pad as u8);
    let n = plain.len();
    let cipher = Encryptor::new(key.0.as_slice().into(), key.iv().into());
    // NoPadding over a whole number of blocks cannot fail.
    let ciphertext = match cipher.encrypt_padded_mut::<NoPadding>(&mut plain, n) {
        Ok(ct) => ct,
        Err(_) => unreachable!("the plaintext was padded to whole blocks"),
    };
    STANDARD.encode(ciphertext)
}

/// Decrypts an `Encrypt` string and checks that it was made for `appid`; returns
/// the message.
pub fn decrypt(key: &PushKey, encrypted: &str, appid: &str) -> Result<Vec<u8>, PushCryptoError> {
    let mut buf = STANDARD
        .decode(encrypted.trim())
        .map_err(|_| PushCryptoError::Base64)?;
    if buf.is_empty() || buf.len() % PAD_BLOCK != 0 {
        return Err(PushCryptoError::BlockLength);
    }
    let cipher = Decryptor::new(key.0.as_slice().into(), key.iv().into());
    let plain = cipher
        .decrypt_padded_mut::<NoPadding>(&mut buf)
        .map_err(|_| PushCryptoError::BlockLength)?;
    let plain = unpad(plain)?;
    let rest = plain.get(RANDOM_LEN..).ok_or(PushCryptoError::Truncated)?;
    let (len, rest) = rest
        .split_first_chunk::<4>()
        .ok_or(PushCryptoError::Truncated)?;
    let len = usize::try_from(u32::from_be_bytes(*len)).map_err(|_| PushCryptoError::Truncated)?;
    if len > rest.len() {
        return Err(PushCryptoError::Truncated);
    }
    let (message, from_appid) = rest.split_at(len);
    if from_appid != appid.as_bytes() {
        return Err(PushCryptoError::WrongAppId);
    }
    Ok(message.to_vec())
}

/// Strict PKCS#7 with 32-byte blocks: the last byte p is 1..=32 and the last p
/// bytes all equal p.
fn unpad(plain: &[u8]) -> Result<&[u8], PushCryptoError> {
    let &last = plain.last().ok_or(PushCryptoError::Padding)?;
    let pad = usize::from(last);
    if !(1..=PAD_BLOCK).contains(&pad) || pad > plain.len() {
        return Err(PushCryptoError::Padding);
    }
    let (body, padding) = plain.split_at(plain.len() - pad);
    if padding.iter().any(|&b| b != last) {
        return Err(PushCryptoError::Padding);
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    // WeChat's published WXBizMsgCrypt sample (WECHAT.md §6), as its Python, Go,
    // Node and wechatpy test suites carry it.
    const TOKEN: &str = "spamtest";
    const KEY: &str = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG";
    const APPID: &str = "wx2c2769f8efd9abc2";
    const TIMESTAMP: &str = "1409735669";
    const NONCE: &str = "1320562132";
    const MSG_SIGNATURE: &str = "5d197aaffba7e9b25a30732f161a50dee96bd5fa";
    const ENCRYPT: &str = "hyzAe4OzmOMbd6TvGdIOO6uBmdJoD0Fk53REIHvxYtJlE2B655HuD0m8KUePWB3+LrPXo87wzQ1QLvbeUgmBM4x6F8PGHQHFVAFmOD2LdJF9FrXpbUAh0B5GIItb52sn896wVsMSHGuPE328HnRGBcrS7C41IzDWyWNlZkyyXwon8T332jisa+h6tEDYsVticbSnyU8dKOIbgU6ux5VTjg3yt+WGzjlpKn6NPhRjpA912xMezR4kw6KWwMrCVKSVCZciVGCgavjIQ6X8tCOp3yZbGpy0VxpAe+77TszTfRd5RJSVO/HTnifJpXgCSUdUue1v6h0EIBYYI1BD1DlD+C0CR8e6OewpusjZ4uBl9FyJvnhvQl+q5rv1ixrcpCumEPo5MJSgM9ehVsNPfUM669WuMyVWQLCzpu9GhglF2PE=";
    const PLAINTEXT: &str = "<xml><ToUserName><![CDATA[gh_10f6c3c3ac5a]]></ToUserName>\n\
<FromUserName><![CDATA[oyORnuP8q7ou2gfYjqLzSIWZf0rs]]></FromUserName>\n\
<CreateTime>1409735668</CreateTime>\n\
<MsgType><![CDATA[text]]></MsgType>\n\
<Content><![CDATA[abcdteT]]></Content>\n\
<MsgId>6054768590064713728</MsgId>\n\
</xml>";

    fn key() -> PushKey {
        PushKey::from_encoding_aes_key(KEY).unwrap()
    }

    #[test]
    fn wechats_published_sample_verifies_and_decrypts() {
        assert_eq!(
            signature(&[TOKEN, TIMESTAMP, NONCE, ENCRYPT]),
            MSG_SIGNATURE
        );
        assert!(verify_signature(
            MSG_SIGNATURE,
            &[TOKEN, TIMESTAMP, NONCE, ENCRYPT]
        ));
        assert!(verify_signature(
            &MSG_SIGNATURE.to_uppercase(),
            &[ENCRYPT, NONCE, TIMESTAMP, TOKEN]
        ));
        let plain = decrypt(&key(), ENCRYPT, APPID).unwrap();
        assert_eq!(String::from_utf8(plain).unwrap(), PLAINTEXT);
    }

    #[test]
    fn a_wrong_signature_is_refused() {
        let parts = [TOKEN, TIMESTAMP, NONCE, ENCRYPT];
        let mut wrong = MSG_SIGNATURE.to_string();
        wrong.replace_range(0..1, "6");
        assert!(!verify_signature(&wrong, &parts));
        assert!(!verify_signature(&MSG_SIGNATURE[..39], &parts));
        assert!(!verify_signature("", &parts));
        assert!(!verify_signature(MSG_SIGNATURE, &[TOKEN, TIMESTAMP, NONCE]));
        assert!(!verify_signature(
            MSG_SIGNATURE,
            &["spamtesu", TIMESTAMP, NONCE, ENCRYPT]
        ));
    }

    #[test]
    fn encryption_round_trips_and_matches_the_sample_byte_for_byte() {
        // Our encryption of the sample's plaintext with the sample's random prefix
        // is the sample's ciphertext: the same bytes WeChat would send.
        let plain = {
            use aes::cipher::BlockDecryptMut;
            let mut buf = STANDARD.decode(ENCRYPT).unwrap();
            let k = key();
            let d = Decryptor::new(k.0.as_slice().into(), k.iv().into());
            d.decrypt_padded_mut::<NoPadding>(&mut buf)
                .unwrap()
                .to_vec()
        };
        let random: [u8; 16] = plain[..16].try_into().unwrap();
        assert_eq!(
            encrypt(&key(), PLAINTEXT.as_bytes(), APPID, random),
            ENCRYPT
        );
        for len in [0, 1, 11, 12, 13, 31, 32, 33, 1000] {
            let msg = vec![b'x'; len];
            let ct = encrypt(&key(), &msg, APPID, [7; 16]);
            assert_eq!(decrypt(&key(), &ct, APPID).unwrap(), msg, "{len}");
        }
    }

    #[test]
    fn a_ciphertext_for_another_app_is_refused() {
        assert_eq!(
            decrypt(&key(), ENCRYPT, "wx2c2769f8efd9abc3"),
            Err(PushCryptoError::WrongAppId)
        );
        assert_eq!(
            decrypt(&key(), ENCRYPT, ""),
            Err(PushCryptoError::WrongAppId)
        );
        let other = PushKey::from_encoding_aes_key(&KEY.replace('a', "b")).unwrap();
        // Another key decrypts to noise: the padding (almost surely) or the
        // length field or the appid gives it away, never a panic.
        assert!(decrypt(&other, ENCRYPT, APPID).is_err());
    }

    #[test]
    fn broken_ciphertexts_are_typed_errors() {
        let k = key();
        assert_eq!(decrypt(&k, "", APPID), Err(PushCryptoError::BlockLength));
        assert_eq!(
            decrypt(&k, "not base64!", APPID),
            Err(PushCryptoError::Base64)
        );
        assert_eq!(
            decrypt(&k, "AAAA", APPID),
            Err(PushCryptoError::BlockLength)
        );
        // 16 bytes: an AES block, not a WXBizMsgCrypt one.
        let sixteen = STANDARD.encode([0u8; 16]);
        assert_eq!(
            decrypt(&k, &sixteen, APPID),
            Err(PushCryptoError::BlockLength)
        );
        let truncated = &ENCRYPT[..ENCRYPT.len() - 44];
        assert!(decrypt(&k, truncated, APPID).is_err());
        // Garbage of every whole-block length: errors, no panic.
        for blocks in 1..6 {
            for seed in 0..64u8 {
                let junk: Vec<u8> = (0..blocks * 32)
                    .map(|i| (i as u8).wrapping_mul(seed))
                    .collect();
                let _ = decrypt(&k, &STANDARD.encode(junk), APPID);
            }
        }
    }

    /// Encrypts a chosen plaintext (already padded or not) with the sample key.
    fn raw(plain: &[u8]) -> String {
        let k = key();
        let mut buf = plain.to_vec();
        let n = buf.len();
        let e = Encryptor::new(k.0.as_slice().into(), k.iv().into());
        STANDARD.encode(e.encrypt_padded_mut::<NoPadding>(&mut buf, n).unwrap())
    }

    #[test]
    fn padding_is_checked_strictly_for_every_pad_value() {
        let k = key();
        let body = |len: u32| {
            let mut p = vec![0u8; 16];
            p.extend_from_slice(&len.to_be_bytes());
            p.extend_from_slice(b"hello");
            p.extend_from_slice(APPID.as_bytes());
            p
        };
        // Valid pads 1..=32 (a message of the right length for each).
        for pad in 1..=32usize {
            // A message of the length that leaves `pad` bytes to the 96-byte end.
            let fill = 96 - pad - (16 + 4 + 5 + APPID.len());
            let mut p = vec![0u8; 16];
            p.extend_from_slice(&(5 + fill as u32).to_be_bytes());
            p.extend_from_slice(b"hello");
            p.extend(std::iter::repeat_n(b'.', fill));
            p.extend_from_slice(APPID.as_bytes());
            p.extend(std::iter::repeat_n(pad as u8, pad));
            assert_eq!(p.len(), 96);
            let msg = decrypt(&k, &raw(&p), APPID).unwrap();
            assert_eq!(msg.len(), 5 + fill, "pad {pad}");
        }
        // Invalid last bytes: 0 and 33..=255.
        for last in [0u8, 33, 64, 255] {
            let mut p = body(5);
            p.resize(64, last);
            assert_eq!(
                decrypt(&k, &raw(&p), APPID),
                Err(PushCryptoError::Padding),
                "{last}"
            );
        }
        // A pad byte that disagrees with the last one.
        let mut p = body(5);
        let pad = 64 - p.len();
        p.resize(64, pad as u8);
        let i = p.len() - 2;
        p[i] ^= 1;
        assert_eq!(decrypt(&k, &raw(&p), APPID), Err(PushCryptoError::Padding));
    }

    #[test]
    fn a_length_field_past_the_end_is_truncated_not_a_panic() {
        let k = key();
        for len in [u32::MAX, 1 << 31, 47, 1000] {
            let mut p = vec![0u8; 16];
            p.extend_from_slice(&len.to_be_bytes());
            p.extend_from_slice(b"hello");
            p.extend_from_slice(APPID.as_bytes());
            let pad = 32 - p.len() % 32;
            p.extend(std::iter::repeat_n(pad as u8, pad));
            assert_eq!(
                decrypt(&k, &raw(&p), APPID),
                Err(PushCryptoError::Truncated),
                "{len}"
            );
        }
        // Shorter than the random prefix and the length field.
        let mut p = vec![0u8; 10];
        p.extend(std::iter::repeat_n(22u8, 22));
        assert_eq!(
            decrypt(&k, &raw(&p), APPID),
            Err(PushCryptoError::Truncated)
        );
    }

    #[test]
    fn keys_are_exactly_43_base64_characters() {
        assert!(PushKey::from_encoding_aes_key(KEY).is_ok());
        for bad in [
            "",
            &KEY[..42],
            &format!("{KEY}A"),
            &KEY.replace('a', "-"),
            &KEY.replace('a', "="),
            &KEY.replace('a', "é")[..43],
        ] {
            assert_eq!(
                PushKey::from_encoding_aes_key(bad).map(|_| ()),
                Err(PushCryptoError::BadKey),
                "{bad:?}"
            );
        }
        let debug = format!("{:?}", key());
        assert!(!debug.contains("abc"), "{debug}");
    }
}
