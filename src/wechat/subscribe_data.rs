//! The value rules WeChat documents for `subscribeMessage.send` data (`thing` at most
//! 20 characters, `number` a number of at most 32 characters, `date` a date, …), by key prefix
//! (`thing1` → `thing`). Keys of unknown types are accepted: a template's keywords
//! are not known here, and the template-message API has none.

use std::collections::BTreeMap;

use chrono::{NaiveDate, NaiveDateTime, NaiveTime};

use crate::wechat::wire::DataValue;

/// The first key whose value breaks its type's rule, as WeChat names it in 47003's
/// errmsg: `data.thing1.value`.
pub fn first_invalid(data: &BTreeMap<String, DataValue>) -> Option<String> {
    data.iter()
        .find(|(key, item)| !valid(key, &item.value))
        .map(|(key, _)| format!("data.{key}.value"))
}

fn valid(key: &str, value: &str) -> bool {
    let kind = key.trim_end_matches(|c: char| c.is_ascii_digit());
    let n = value.chars().count();
    if n == 0 {
        return !KNOWN_KINDS.contains(&kind);
    }
    match kind {
        "thing" => n <= 20,
        "number" => n <= 32 && is_number(value),
        "letter" => n <= 32 && value.chars().all(|c| c.is_ascii_alphabetic()),
        "symbol" => n <= 5 && value.chars().all(is_symbol),
        "character_string" => {
            n <= 32
                && value
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || is_symbol(c))
        }
        "time" => is_range(value, is_time),
        "date" => is_range(value, is_date),
        "amount" => is_amount(value),
        "phone_number" => n <= 17 && value.chars().all(|c| c.is_ascii_digit() || is_symbol(c)),
        "car_number" => n <= 8,
        "name" => {
            (n <= 10 && value.chars().all(is_cjk))
                || (n <= 20 && value.chars().all(|c| c.is_ascii_alphabetic() || c == ' '))
        }
        "phrase" => n <= 5 && value.chars().all(is_cjk),
        _ => true,
    }
}

/// The types the rules know; their values may not be empty.
const KNOWN_KINDS: [&str; 12] = [
    "thing",
    "number",
    "letter",
    "symbol",
    "character_string",
    "time",
    "date",
    "amount",
    "phone_number",
    "car_number",
    "name",
    "phrase",
];

fn is_symbol(c: char) -> bool {
    c.is_ascii_punctuation()
}

fn is_cjk(c: char) -> bool {
    matches!(c, '\u{4e00}'..='\u{9fff}' | '\u{3400}'..='\u{4dbf}')
}

fn is_number(v: &str) -> bool {
    let mut parts = v.splitn(2, '.');
    let int = parts.next().unwrap_or_default();
    let frac = parts.next();
    !int.is_empty()
        && int.chars().all(|c| c.is_ascii_digit())
        && frac.is_none_or(|f| !f.is_empty() && f.chars().all(|c| c.is_ascii_digit()))
}

/// One currency sign (optional), ≤ 10 digits (a decimal part allowed), may end in 元.
fn is_amount(v: &str) -> bool {
    let v = v.strip_suffix('元').unwrap_or(v);
    let v = v.strip_prefix(['¥', '￥', '$', '€', '£']).unwrap_or(v);
    is_number(v) && v.chars().filter(char::is_ascii_digit).count() <= 10
}

/// One value or a `from~to` range.
fn is_range(v: &str, one: fn(&str) -> bool) -> bool {
    let parts: Vec<&str> = v.split('~').map(str::trim).collect();
    parts.len() <= 2 && parts.iter().all(|p| one(p))
}

const TIME_FORMATS: [&str; 2] = ["%H:%M", "%H:%M:%S"];
const DATE_FORMATS: [&str; 3] = ["%Y-%m-%d", "%Y/%m/%d", "%Y年%m月%d日"];
const DATETIME_FORMATS: [&str; 6] = [
    "%Y-%m-%d %H:%M",
    "%Y-%m-%d %H:%M:%S",
    "%Y/%m/%d %H:%M",
    "%Y/%m/%d %H:%M:%S",
    "%Y年%m月%d日 %H:%M",
    "%Y年%m月%d日 %H:%M:%S",
];

fn is_datetime(v: &str) -> bool {
    DATETIME_FORMATS
        .iter()
        .any(|f| NaiveDateTime::parse_from_str(v, f).is_ok())
}

fn is_time(v: &str) -> bool {
    TIME_FORMATS
        .iter()
        .any(|f| NaiveTime::parse_from_str(v, f).is_ok())
        || is_datetime(v)
}

fn is_date(v: &str) -> bool {
    DATE_FORMATS
        .iter()
        .any(|f| NaiveDate::parse_from_str(v, f).is_ok())
        || is_datetime(v)
}

#[cfg(test)]
mod tests {
    use super::valid;

    #[test]
    fn values_by_type() {
        let cases = [
            ("thing1", "二十个字以内的任何内容都可以", true),
            ("thing1", "this is longer than twenty chars", false),
            ("thing2", "", false),
            ("number1", "3.14", true),
            ("number1", "12a", false),
            ("letter1", "abcXYZ", true),
            ("letter1", "abc1", false),
            ("symbol1", "%$#", true),
            ("symbol1", "%%%%%%", false),
            ("character_string1", "AB-123_x", true),
            ("character_string1", "中文", false),
            ("time1", "15:01", true),
            ("time1", "2019年10月1日 15:01", true),
            ("time1", "15:01~16:30", true),
            ("time1", "25:01", false),
            ("date1", "2019-10-01", true),
            ("date1", "2019年10月1日~2019年10月2日", true),
            ("date1", "yesterday", false),
            ("amount1", "¥100.50元", true),
            ("amount1", "100元", true),
            ("amount1", "$12345678901", false),
            ("phone_number1", "+86-0755-1234567", true),
            ("phone_number1", "call me", false),
            ("car_number1", "粤A12345", true),
            ("car_number1", "粤A1234567", false),
            ("name1", "张三", true),
            ("name1", "John Smith", true),
            ("name1", "张三 Smith", false),
            ("phrase1", "已发货", true),
            ("phrase1", "shipped", false),
            ("keyword1", "", true),
        ];
        for (key, value, ok) in cases {
            assert_eq!(valid(key, value), ok, "{key} = {value:?}");
        }
    }
}
