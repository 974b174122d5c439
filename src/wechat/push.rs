//! The bodies WeChat pushes to the message-push URL (WECHAT.md §6), XML or JSON,
//! read into one shape. Plain parsing: no HTTP, no database, no crypto (see
//! [`super::push_crypto`]).
//!
//! An XML body is first turned into the JSON value it stands for (an element with
//! text is a string, one with children an object, a repeated child an array), so
//! both formats go through one reader — and WeChat's JSON `List`, an object for one
//! item and an array for several, is read the same way as repeated `<List>`s.

use quick_xml::events::Event;
use quick_xml::Reader;
use serde_json::{Map, Value};

/// A push body that is not one WeChat sends.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PushParseError(pub String);

fn bad(message: impl Into<String>) -> PushParseError {
    PushParseError(message.into())
}

/// Deepest element nesting read (WeChat's events nest three deep).
const MAX_DEPTH: usize = 8;

/// The body's format: JSON if it starts with `{`, XML otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Xml,
    Json,
}

impl Format {
    pub fn of(body: &str) -> Format {
        if body.trim_start().starts_with('{') {
            Format::Json
        } else {
            Format::Xml
        }
    }
}

/// Reads a body (outer envelope or decrypted message) into its fields.
pub fn fields(body: &str) -> Result<Map<String, Value>, PushParseError> {
    let value = match Format::of(body) {
        Format::Json => {
            serde_json::from_str(body).map_err(|e| bad(format!("not valid JSON: {e}")))?
        }
        Format::Xml => xml_to_json(body)?,
    };
    match value {
        Value::Object(map) => Ok(map),
        _ => Err(bad("the body is not an object")),
    }
}

/// `<xml>…</xml>` as a JSON object. Declarations, comments and processing
/// instructions are skipped; a DOCTYPE is refused (no entities, ever).
fn xml_to_json(body: &str) -> Result<Value, PushParseError> {
    let mut reader = Reader::from_str(body);
    reader.config_mut().trim_text(true);
    // Open elements: (name, children so far, text so far).
    let mut stack: Vec<(String, Map<String, Value>, String)> = Vec::new();
    let mut root: Option<Value> = None;
    loop {
        let event = reader
            .read_event()
            .map_err(|e| bad(format!("not valid XML: {e}")))?;
        match event {
            Event::Start(start) => {
                if root.is_some() {
                    return Err(bad("not valid XML: content after the root element"));
                }
                if stack.len() >= MAX_DEPTH {
                    return Err(bad("not valid XML: nested too deep"));
                }
                let name = String::from_utf8_lossy(start.name().as_ref()).into_owned();
                stack.push((name, Map::new(), String::new()));
            }
            Event::Empty(start) => {
                let name = String::from_utf8_lossy(start.name().as_ref()).into_owned();
                match stack.last_mut() {
                    Some((_, children, _)) => {
                        add_child(children, name, Value::String(String::new()))
                    }
                    None => return Err(bad("not valid XML: an empty root element")),
                }
            }
            Event::Text(text) => {
                let text = text
                    .unescape()
                    .map_err(|e| bad(format!("not valid XML: {e}")))?;
                match stack.last_mut() {
                    Some((_, _, own)) => own.push_str(&text),
                    None => return Err(bad("not valid XML: text outside the root element")),
                }
            }
            Event::CData(data) => {
                let text = data
                    .decode()
                    .map_err(|e| bad(format!("not valid XML: {e}")))?;
                match stack.last_mut() {
                    Some((_, _, own)) => own.push_str(&text),
                    None => return Err(bad("not valid XML: CDATA outside the root element")),
                }
            }
            Event::End(_) => {
                let Some((name, children, text)) = stack.pop() else {
                    return Err(bad("not valid XML: an unopened end tag"));
                };
                let value = if children.is_empty() {
                    Value::String(text)
                } else {
                    Value::Object(children)
                };
                match stack.last_mut() {
                    Some((_, parent, _)) => add_child(parent, name, value),
                    None => {
                        if name != "xml" {
                            return Err(bad("not valid XML: the root element is not <xml>"));
                        }
                        root = Some(value);
                    }
                }
            }
            Event::DocType(_) => return Err(bad("not valid XML: a DOCTYPE is not accepted")),
            Event::Decl(_) | Event::Comment(_) | Event::PI(_) => {}
            Event::Eof => break,
        }
    }
    if !stack.is_empty() {
        return Err(bad("not valid XML: an element is not closed"));
    }
    match root {
        Some(Value::Object(map)) => Ok(Value::Object(map)),
        Some(_) => Ok(Value::Object(Map::new())),
        None => Err(bad("not valid XML: no <xml> element")),
    }
}

/// A repeated child becomes an array of its values, in order.
fn add_child(children: &mut Map<String, Value>, name: String, value: Value) {
    match children.get_mut(&name) {
        None => {
            children.insert(name, value);
        }
        Some(Value::Array(items)) => items.push(value),
        Some(first) => {
            let first = std::mem::take(first);
            children.insert(name, Value::Array(vec![first, value]));
        }
    }
}

/// A field as text: a string, or a number written as one (JSON's `CreateTime`).
fn text(map: &Map<String, Value>, name: &str) -> Option<String> {
    match map.get(name)? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn required(map: &Map<String, Value>, name: &str) -> Result<String, PushParseError> {
    text(map, name)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| bad(format!("{name} is missing or not text")))
}

/// The subscribe-message events the ledger applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// `subscribe_msg_popup_event`: the user answered the popup.
    Popup,
    /// `subscribe_msg_change_event`: the user changed a template in settings.
    Change,
    /// `subscribe_msg_sent_event`: the asynchronous result of a subscribe send.
    Sent,
}

impl EventKind {
    pub fn event_name(self) -> &'static str {
        match self {
            EventKind::Popup => "subscribe_msg_popup_event",
            EventKind::Change => "subscribe_msg_change_event",
            EventKind::Sent => "subscribe_msg_sent_event",
        }
    }

    fn list_field(self) -> &'static str {
        match self {
            EventKind::Popup => "SubscribeMsgPopupEvent",
            EventKind::Change => "SubscribeMsgChangeEvent",
            EventKind::Sent => "SubscribeMsgSentEvent",
        }
    }

    fn from_event(name: &str) -> Option<EventKind> {
        [EventKind::Popup, EventKind::Change, EventKind::Sent]
            .into_iter()
            .find(|k| k.event_name() == name)
    }
}

/// One item of a popup or change event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscribeStatus {
    pub template_id: String,
    /// `accept`, `reject` (and, from the popup, whatever else WeChat says).
    pub status: String,
}

/// One item of a sent event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentResult {
    pub template_id: String,
    /// The `msgid` subscribe/send returned.
    pub msg_id: String,
    /// `0` is delivered.
    pub error_code: String,
    /// `success`, `fail:user refuse to accept the msg`, `fail:system failed`, …
    pub error_status: String,
}

/// What a push says, as far as the ledger cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PushBody {
    Popup(Vec<SubscribeStatus>),
    Change(Vec<SubscribeStatus>),
    Sent(Vec<SentResult>),
    /// Anything else (customer-service messages, other events): not the ledger's.
    Other,
}

/// A decrypted (or plaintext) push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Push {
    /// The user (openid).
    pub from_user: String,
    pub create_time: i64,
    pub msg_type: String,
    /// `Event`, for `MsgType` event.
    pub event: Option<String>,
    /// `MsgId`, for messages.
    pub msg_id: Option<String>,
    pub body: PushBody,
}

impl Push {
    /// Reads a plaintext push. Only the subscribe-message events must carry their
    /// fields; anything else needs only what identifies it for deduplication.
    pub fn parse(plain: &str) -> Result<Push, PushParseError> {
        let map = fields(plain)?;
        let from_user = required(&map, "FromUserName")?;
        let create_time = required(&map, "CreateTime")?
            .trim()
            .parse::<i64>()
            .map_err(|_| bad("CreateTime is not a whole number"))?;
        let msg_type = required(&map, "MsgType")?;
        let event = text(&map, "Event");
        let msg_id = text(&map, "MsgId").or_else(|| text(&map, "MsgID"));
        let kind = (msg_type == "event")
            .then(|| event.as_deref().and_then(EventKind::from_event))
            .flatten();
        let body = match kind {
            None => PushBody::Other,
            Some(kind) => {
                let items = list(&map, kind)?;
                match kind {
                    EventKind::Popup => PushBody::Popup(statuses(&items)?),
                    EventKind::Change => PushBody::Change(statuses(&items)?),
                    EventKind::Sent => PushBody::Sent(
                        items
                            .iter()
                            .map(|item| {
                                Ok(SentResult {
                                    template_id: required(item, "TemplateId")?,
                                    msg_id: required(item, "MsgID")?,
                                    error_code: required(item, "ErrorCode")?,
                                    error_status: text(item, "ErrorStatus").unwrap_or_default(),
                                })
                            })
                            .collect::<Result<_, PushParseError>>()?,
                    ),
                }
            }
        };
        Ok(Push {
            from_user,
            create_time,
            msg_type,
            event,
            msg_id,
            body,
        })
    }
}

/// The event's `List`: one object or an array of them.
fn list(
    map: &Map<String, Value>,
    kind: EventKind,
) -> Result<Vec<Map<String, Value>>, PushParseError> {
    let field = kind.list_field();
    let holder = map
        .get(field)
        .and_then(Value::as_object)
        .ok_or_else(|| bad(format!("{field} is missing or not an object")))?;
    let items = match holder.get("List") {
        Some(Value::Object(one)) => vec![one.clone()],
        Some(Value::Array(many)) => many
            .iter()
            .map(|v| {
                v.as_object()
                    .cloned()
                    .ok_or_else(|| bad(format!("{field}.List holds a non-object")))
            })
            .collect::<Result<_, _>>()?,
        _ => return Err(bad(format!("{field}.List is missing"))),
    };
    Ok(items)
}

fn statuses(items: &[Map<String, Value>]) -> Result<Vec<SubscribeStatus>, PushParseError> {
    items
        .iter()
        .map(|item| {
            Ok(SubscribeStatus {
                template_id: required(item, "TemplateId")?,
                status: required(item, "SubscribeStatusString")?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const POPUP_XML: &str = "<xml><ToUserName><![CDATA[gh_123456789abc]]></ToUserName>\
<FromUserName><![CDATA[o7esq5OI1Uej6Xixw1lA2H7XDVbc]]></FromUserName>\
<CreateTime>1620973045</CreateTime><MsgType><![CDATA[event]]></MsgType>\
<Event><![CDATA[subscribe_msg_popup_event]]></Event>\
<SubscribeMsgPopupEvent>\
<List><TemplateId><![CDATA[hD-ixGOhYmUfjOnI8MCzQMPshzGVeux_2vBgEGC5pE]]></TemplateId>\
<SubscribeStatusString><![CDATA[accept]]></SubscribeStatusString><PopupScene>0</PopupScene></List>\
<List><TemplateId><![CDATA[TPL2]]></TemplateId>\
<SubscribeStatusString><![CDATA[reject]]></SubscribeStatusString><PopupScene>0</PopupScene></List>\
</SubscribeMsgPopupEvent></xml>";

    #[test]
    fn an_xml_popup_with_two_items() {
        let push = Push::parse(POPUP_XML).unwrap();
        assert_eq!(push.from_user, "o7esq5OI1Uej6Xixw1lA2H7XDVbc");
        assert_eq!(push.create_time, 1620973045);
        assert_eq!(push.event.as_deref(), Some("subscribe_msg_popup_event"));
        let PushBody::Popup(items) = push.body else {
            panic!("{:?}", push.body)
        };
        assert_eq!(items.len(), 2);
        assert_eq!(
            items[0].template_id,
            "hD-ixGOhYmUfjOnI8MCzQMPshzGVeux_2vBgEGC5pE"
        );
        assert_eq!(items[0].status, "accept");
        assert_eq!(
            (items[1].template_id.as_str(), items[1].status.as_str()),
            ("TPL2", "reject")
        );
    }

    #[test]
    fn json_lists_are_an_object_or_an_array() {
        let one = r#"{"ToUserName":"gh_1","FromUserName":"u1","CreateTime":1620963428,"MsgType":"event",
            "Event":"subscribe_msg_change_event",
            "SubscribeMsgChangeEvent":{"List":{"TemplateId":"T1","SubscribeStatusString":"reject"}}}"#;
        let push = Push::parse(one).unwrap();
        assert_eq!(
            push.body,
            PushBody::Change(vec![SubscribeStatus {
                template_id: "T1".into(),
                status: "reject".into()
            }])
        );
        let many = r#"{"FromUserName":"u1","CreateTime":"1620963428","MsgType":"event",
            "Event":"subscribe_msg_sent_event",
            "SubscribeMsgSentEvent":{"List":[
              {"TemplateId":"T1","MsgID":"1700827132819554304","ErrorCode":"0","ErrorStatus":"success"},
              {"TemplateId":"T2","MsgID":1700827132819554305,"ErrorCode":43101,"ErrorStatus":"fail:user refuse to accept the msg"}]}}"#;
        let PushBody::Sent(items) = Push::parse(many).unwrap().body else {
            panic!()
        };
        assert_eq!(items.len(), 2);
        assert_eq!(
            (items[1].msg_id.as_str(), items[1].error_code.as_str()),
            ("1700827132819554305", "43101")
        );
    }

    #[test]
    fn other_pushes_need_only_their_identity() {
        let text = "<xml><ToUserName>gh</ToUserName><FromUserName>u1</FromUserName>\
<CreateTime>1</CreateTime><MsgType>text</MsgType><Content>hi</Content><MsgId>42</MsgId></xml>";
        let push = Push::parse(text).unwrap();
        assert_eq!(
            (push.body, push.msg_id.as_deref()),
            (PushBody::Other, Some("42"))
        );
        let event = r#"{"FromUserName":"u1","CreateTime":2,"MsgType":"event","Event":"user_enter_tempsession"}"#;
        assert_eq!(Push::parse(event).unwrap().body, PushBody::Other);
    }

    #[test]
    fn malformed_bodies_are_errors() {
        for body in [
            "",
            "<xml>",
            "<xml><a></b></xml>",
            "<notxml><FromUserName>u</FromUserName></notxml>",
            "<xml/>",
            "<!DOCTYPE x [<!ENTITY e \"boom\">]><xml><FromUserName>&e;</FromUserName></xml>",
            "<xml><FromUserName>u1</FromUserName><CreateTime>soon</CreateTime><MsgType>event</MsgType></xml>",
            "<xml><FromUserName>u1</FromUserName><CreateTime>1</CreateTime></xml>",
            "<xml><FromUserName>u1</FromUserName><CreateTime>1</CreateTime><MsgType>event</MsgType>\
<Event>subscribe_msg_popup_event</Event></xml>",
            "<xml><FromUserName>u1</FromUserName><CreateTime>1</CreateTime><MsgType>event</MsgType>\
<Event>subscribe_msg_sent_event</Event><SubscribeMsgSentEvent><List><TemplateId>T</TemplateId></List></SubscribeMsgSentEvent></xml>",
            "{",
            "[1]",
            r#"{"FromUserName":"u1","CreateTime":1,"MsgType":"event","Event":"subscribe_msg_popup_event","SubscribeMsgPopupEvent":{"List":[1]}}"#,
            "<xml><a><b><c><d><e><f><g><h><i>deep</i></h></g></f></e></d></c></b></a></xml>",
            "<xml></xml><xml></xml>",
        ] {
            assert!(Push::parse(body).is_err(), "{body:?}");
        }
    }

    #[test]
    fn an_envelope_yields_its_encrypt_field() {
        let xml = "<xml><ToUserName><![CDATA[gh]]></ToUserName><Encrypt><![CDATA[abc+/=]]></Encrypt></xml>";
        assert_eq!(fields(xml).unwrap()["Encrypt"], "abc+/=");
        let json = r#"{"ToUserName":"gh","Encrypt":"abc+/="}"#;
        assert_eq!(fields(json).unwrap()["Encrypt"], "abc+/=");
    }
}
