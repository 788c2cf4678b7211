//! The float types the CPU code runs in: `f32` (training) and `f64`
//! (checks), behind one small trait used by the CPU gradient engine, DBP
//! and the CPU GEMMs (`ops::gemm`).
use std::borrow::Cow;
use std::fmt::Debug;
use std::ops::{Add, AddAssign, Div, Mul, MulAssign, Neg, Sub, SubAssign};

/// The float type the engine runs in: `f32` for training, `f64` for checks.
pub trait Real:
    Copy
    + Send
    + Sync
    + Default
    + Debug
    + PartialOrd
    + 'static
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
    + SubAssign
    + MulAssign
{
    /// 0.
    const ZERO: Self;
    /// 1.
    const ONE: Self;
    /// −∞.
    const NEG_INFINITY: Self;
    /// Converts from f32.
    fn from_f32(x: f32) -> Self;
    /// Converts from f64 (rounding for f32).
    fn from_f64(x: f64) -> Self;
    /// Widens to f64.
    fn to_f64(self) -> f64;
    /// Converts to f32 (rounding for f64).
    fn to_f32(self) -> f32;
    /// eˣ.
    fn exp(self) -> Self;
    /// Natural logarithm.
    fn ln(self) -> Self;
    /// Hyperbolic tangent.
    fn tanh(self) -> Self;
    /// Square root.
    fn sqrt(self) -> Self;
    /// `self * a + b` with one rounding.
    fn mul_add(self, a: Self, b: Self) -> Self;
    /// |x|.
    fn abs(self) -> Self;
    /// Neither infinite nor NaN.
    fn is_finite(self) -> bool;
    /// The weights as this type: borrowed for `f32`, converted for `f64`.
    fn cow(x: &[f32]) -> Cow<'_, [Self]>;
    #[inline(always)]
    /// The larger of the two (`self` when they compare equal or unordered).
    fn max(self, o: Self) -> Self {
        if self >= o {
            self
        } else {
            o
        }
    }
    #[inline(always)]
    /// 1 / (1 + e⁻ˣ).
    fn sigmoid(self) -> Self {
        Self::ONE / (Self::ONE + (-self).exp())
    }
    /// `x` as this type (for constants in generic code).
    #[inline(always)]
    fn c(x: f64) -> Self {
        Self::from_f64(x)
    }
    /// `Σ x` in order.
    #[inline(always)]
    fn sum(x: impl IntoIterator<Item = Self>) -> Self {
        x.into_iter().fold(Self::ZERO, |a, b| a + b)
    }
}

macro_rules! impl_real {
    ($t:ty, $cow:expr) => {
        impl Real for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            const NEG_INFINITY: Self = <$t>::NEG_INFINITY;
            #[inline(always)]
            fn from_f32(x: f32) -> Self {
                x as $t
            }
            #[inline(always)]
            fn from_f64(x: f64) -> Self {
                x as $t
            }
            #[inline(always)]
            fn to_f64(self) -> f64 {
                self as f64
            }
            #[inline(always)]
            fn to_f32(self) -> f32 {
                self as f32
            }
            #[inline(always)]
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            #[inline(always)]
            fn ln(self) -> Self {
                <$t>::ln(self)
            }
            #[inline(always)]
            fn tanh(self) -> Self {
                <$t>::tanh(self)
            }
            #[inline(always)]
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            #[inline(always)]
            fn mul_add(self, a: Self, b: Self) -> Self {
                <$t>::mul_add(self, a, b)
            }
            #[inline(always)]
            fn abs(self) -> Self {
                <$t>::abs(self)
            }
            #[inline(always)]
            fn is_finite(self) -> bool {
                <$t>::is_finite(self)
            }
            fn cow(x: &[f32]) -> Cow<'_, [Self]> {
                $cow(x)
            }
        }
    };
}
fn cow_f32(x: &[f32]) -> Cow<'_, [f32]> {
    Cow::Borrowed(x)
}
fn cow_f64(x: &[f32]) -> Cow<'_, [f64]> {
    Cow::Owned(x.iter().map(|&v| v as f64).collect())
}
impl_real!(f32, cow_f32);
impl_real!(f64, cow_f64);
