//! `formid_ledger::ledger::is_valid_value` on arbitrary text: never panics, and
//! agrees with the contract's rule written the simplest way: 1..=128 bytes, every
//! byte printable ASCII other than space (0x21..=0x7E). Bytes that are not UTF-8
//! cannot reach the service as a JSON string, so they are skipped.
#![no_main]

use libfuzzer_sys::fuzz_target;

fn reference(value: &[u8]) -> bool {
    (1..=128).contains(&value.len()) && value.iter().all(|&b| (0x21..=0x7E).contains(&b))
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let got = formid_ledger::ledger::is_valid_value(text);
    let want = reference(text.as_bytes());
    assert_eq!(got, want, "is_valid_value({text:?}) = {got}, the rule says {want}");
    // The devtools' mock value contains spaces: it must never pass as a value.
    if text == formid_ledger::ledger::MOCK_FORM_ID {
        assert!(!got);
    }
});
