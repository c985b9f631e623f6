//! GGUF metadata values: typed views over the mapped bytes, and their encoding.

use std::borrow::Cow;
use std::fmt;

/// The type tag of a GGUF metadata value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum ValueType {
    /// u8
    U8 = 0,
    /// i8
    I8 = 1,
    /// u16
    U16 = 2,
    /// i16
    I16 = 3,
    /// u32
    U32 = 4,
    /// i32
    I32 = 5,
    /// f32
    F32 = 6,
    /// bool (one byte, 0 or 1)
    Bool = 7,
    /// u64 length + UTF-8 bytes
    String = 8,
    /// element type + u64 count + elements
    Array = 9,
    /// u64
    U64 = 10,
    /// i64
    I64 = 11,
    /// f64
    F64 = 12,
}

impl ValueType {
    /// The type with this GGUF tag.
    pub fn from_id(id: u32) -> Option<ValueType> {
        use ValueType::*;
        Some(match id {
            0 => U8,
            1 => I8,
            2 => U16,
            3 => I16,
            4 => U32,
            5 => I32,
            6 => F32,
            7 => Bool,
            8 => String,
            9 => Array,
            10 => U64,
            11 => I64,
            12 => F64,
            _ => return None,
        })
    }

    /// Encoded size of one value, for fixed-size types.
    pub fn fixed_size(self) -> Option<usize> {
        use ValueType::*;
        match self {
            U8 | I8 | Bool => Some(1),
            U16 | I16 => Some(2),
            U32 | I32 | F32 => Some(4),
            U64 | I64 | F64 => Some(8),
            String | Array => None,
        }
    }

    /// Lower-case name as gguf-py prints it ("uint32", "string").
    pub fn name(self) -> &'static str {
        use ValueType::*;
        match self {
            U8 => "uint8",
            I8 => "int8",
            U16 => "uint16",
            I16 => "int16",
            U32 => "uint32",
            I32 => "int32",
            F32 => "float32",
            Bool => "bool",
            String => "string",
            Array => "array",
            U64 => "uint64",
            I64 => "int64",
            F64 => "float64",
        }
    }
}

/// A metadata value: scalars by value, strings and arrays borrowed from the file
/// where they came from one (so a 49k-token vocabulary is never copied to be read).
#[derive(Debug, Clone, PartialEq)]
pub enum MetadataValue<'a> {
    /// u8
    U8(u8),
    /// i8
    I8(i8),
    /// u16
    U16(u16),
    /// i16
    I16(i16),
    /// u32
    U32(u32),
    /// i32
    I32(i32),
    /// f32
    F32(f32),
    /// bool
    Bool(bool),
    /// UTF-8 string
    String(Cow<'a, str>),
    /// array of values of one type
    Array(MetadataArray<'a>),
    /// u64
    U64(u64),
    /// i64
    I64(i64),
    /// f64
    F64(f64),
}

/// A GGUF array: either still encoded in the file (walked lazily) or built in memory.
#[derive(Debug, Clone, PartialEq)]
pub enum MetadataArray<'a> {
    /// Elements as encoded in the file; `bytes` were checked to hold exactly `len` of them.
    Encoded {
        /// element type
        elem: ValueType,
        /// element count
        len: usize,
        /// the encoded elements, without the type tag and count
        bytes: &'a [u8],
    },
    /// Elements built in memory; all must have type `elem`.
    Owned {
        /// element type
        elem: ValueType,
        /// the elements
        items: Vec<MetadataValue<'a>>,
    },
}

impl<'a> MetadataValue<'a> {
    /// The value's type tag.
    pub fn value_type(&self) -> ValueType {
        use MetadataValue as V;
        match self {
            V::U8(_) => ValueType::U8,
            V::I8(_) => ValueType::I8,
            V::U16(_) => ValueType::U16,
            V::I16(_) => ValueType::I16,
            V::U32(_) => ValueType::U32,
            V::I32(_) => ValueType::I32,
            V::F32(_) => ValueType::F32,
            V::Bool(_) => ValueType::Bool,
            V::String(_) => ValueType::String,
            V::Array(_) => ValueType::Array,
            V::U64(_) => ValueType::U64,
            V::I64(_) => ValueType::I64,
            V::F64(_) => ValueType::F64,
        }
    }

    /// The string, if this is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetadataValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// The array, if this is one.
    pub fn as_array(&self) -> Option<&MetadataArray<'a>> {
        match self {
            MetadataValue::Array(a) => Some(a),
            _ => None,
        }
    }

    /// Any integer type (or bool) as u64, if non-negative.
    pub fn as_u64(&self) -> Option<u64> {
        use MetadataValue as V;
        match *self {
            V::U8(v) => Some(v as u64),
            V::U16(v) => Some(v as u64),
            V::U32(v) => Some(v as u64),
            V::U64(v) => Some(v),
            V::I8(v) => u64::try_from(v).ok(),
            V::I16(v) => u64::try_from(v).ok(),
            V::I32(v) => u64::try_from(v).ok(),
            V::I64(v) => u64::try_from(v).ok(),
            V::Bool(v) => Some(v as u64),
            _ => None,
        }
    }

    /// Any numeric type as f64.
    pub fn as_f64(&self) -> Option<f64> {
        use MetadataValue as V;
        match *self {
            V::F32(v) => Some(v as f64),
            V::F64(v) => Some(v),
            V::I8(v) => Some(v as f64),
            V::I16(v) => Some(v as f64),
            V::I32(v) => Some(v as f64),
            V::I64(v) => Some(v as f64),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    /// A bool, if this is one.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            MetadataValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// An owned string value.
    pub fn string(s: impl Into<String>) -> MetadataValue<'static> {
        MetadataValue::String(Cow::Owned(s.into()))
    }

    /// An array of strings built in memory.
    pub fn string_array<S: Into<String>>(
        items: impl IntoIterator<Item = S>,
    ) -> MetadataValue<'static> {
        MetadataValue::Array(MetadataArray::Owned {
            elem: ValueType::String,
            items: items.into_iter().map(MetadataValue::string).collect(),
        })
    }

    /// Append this value's GGUF v3 encoding (without its type tag) to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        use MetadataValue as V;
        match self {
            V::U8(v) => out.push(*v),
            V::I8(v) => out.extend_from_slice(&v.to_le_bytes()),
            V::U16(v) => out.extend_from_slice(&v.to_le_bytes()),
            V::I16(v) => out.extend_from_slice(&v.to_le_bytes()),
            V::U32(v) => out.extend_from_slice(&v.to_le_bytes()),
            V::I32(v) => out.extend_from_slice(&v.to_le_bytes()),
            V::F32(v) => out.extend_from_slice(&v.to_le_bytes()),
            V::Bool(v) => out.push(*v as u8),
            V::String(s) => encode_str(s, out),
            V::U64(v) => out.extend_from_slice(&v.to_le_bytes()),
            V::I64(v) => out.extend_from_slice(&v.to_le_bytes()),
            V::F64(v) => out.extend_from_slice(&v.to_le_bytes()),
            V::Array(a) => {
                out.extend_from_slice(&(a.elem_type() as u32).to_le_bytes());
                out.extend_from_slice(&(a.len() as u64).to_le_bytes());
                match a {
                    MetadataArray::Encoded { bytes, .. } => out.extend_from_slice(bytes),
                    MetadataArray::Owned { items, .. } => items.iter().for_each(|v| v.encode(out)),
                }
            }
        }
    }
}

/// Append a GGUF string (u64 length, then the bytes).
pub fn encode_str(s: &str, out: &mut Vec<u8>) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

impl<'a> MetadataArray<'a> {
    /// The element type.
    pub fn elem_type(&self) -> ValueType {
        match self {
            MetadataArray::Encoded { elem, .. } | MetadataArray::Owned { elem, .. } => *elem,
        }
    }

    /// The element count.
    pub fn len(&self) -> usize {
        match self {
            MetadataArray::Encoded { len, .. } => *len,
            MetadataArray::Owned { items, .. } => items.len(),
        }
    }

    /// True when the array has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The elements in order. Encoded arrays are decoded one at a time.
    pub fn iter(&self) -> Box<dyn Iterator<Item = MetadataValue<'a>> + '_> {
        match self {
            MetadataArray::Owned { items, .. } => Box::new(items.iter().cloned()),
            MetadataArray::Encoded { elem, len, bytes } => {
                let (elem, mut rest) = (*elem, *bytes);
                // The reader validated these bytes when it opened the file,
                // so decoding cannot fail here.
                Box::new((0..*len).map(move |_| {
                    let (value, used) = crate::gguf::reader::decode_validated(elem, rest);
                    rest = &rest[used..];
                    value
                }))
            }
        }
    }

    /// The elements as strings, if this is an array of strings.
    pub fn strings(&self) -> Option<impl Iterator<Item = Cow<'a, str>> + '_> {
        (self.elem_type() == ValueType::String).then(|| {
            self.iter().map(|v| match v {
                MetadataValue::String(s) => s,
                _ => unreachable!("array elements share the array's type"),
            })
        })
    }
}

impl fmt::Display for MetadataValue<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use MetadataValue as V;
        match self {
            V::U8(v) => write!(f, "{v}"),
            V::I8(v) => write!(f, "{v}"),
            V::U16(v) => write!(f, "{v}"),
            V::I16(v) => write!(f, "{v}"),
            V::U32(v) => write!(f, "{v}"),
            V::I32(v) => write!(f, "{v}"),
            V::F32(v) => write!(f, "{}", crate::number::compact(*v)),
            V::Bool(v) => write!(f, "{v}"),
            V::String(s) => write!(f, "{s:?}"),
            V::U64(v) => write!(f, "{v}"),
            V::I64(v) => write!(f, "{v}"),
            V::F64(v) => write!(f, "{}", crate::number::compact(*v)),
            V::Array(a) => write!(f, "[{}; {}]", a.elem_type().name(), a.len()),
        }
    }
}

macro_rules! from_scalar {
    ($($t:ty => $v:ident),*) => {$(
        impl From<$t> for MetadataValue<'static> {
            fn from(x: $t) -> Self { MetadataValue::$v(x) }
        }
    )*};
}
from_scalar!(u8 => U8, i8 => I8, u16 => U16, i16 => I16, u32 => U32, i32 => I32, f32 => F32,
             bool => Bool, u64 => U64, i64 => I64, f64 => F64);

impl<'a> From<&'a str> for MetadataValue<'a> {
    fn from(s: &'a str) -> Self {
        MetadataValue::String(Cow::Borrowed(s))
    }
}
