//! What a call cost, from the configured price table. Money is counted in
//! nano-dollars (integers) so that sums of many small calls stay exact; a
//! model without a price costs 0 *and says so* (`priced = false`), so that
//! "free" is never confused with "unknown".

use std::collections::HashMap;

use plinth_runtime::config::AiPrice;

use crate::model::Usage;

/// Prices of one provider model, nano-dollars per token.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Rates {
    input: f64,
    output: f64,
    cached_input: f64,
    cache_write: f64,
}

/// The price table.
#[derive(Debug, Default)]
pub struct Prices {
    by_provider_model: HashMap<(String, String), Rates>,
    by_model: HashMap<String, Rates>,
}

/// A call's cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Cost {
    /// Nano-dollars.
    pub nanos: i64,
    /// Whether the table knew the model.
    pub priced: bool,
}

impl Cost {
    /// US dollars.
    pub fn usd(self) -> f64 {
        self.nanos as f64 / 1e9
    }
}

impl Prices {
    /// The table from settings (dollars per million tokens = nano-dollars
    /// per token × 1,000).
    pub fn new(prices: &[AiPrice]) -> Self {
        let mut table = Prices::default();
        for p in prices {
            let rates = Rates {
                input: p.input * 1000.0,
                output: p.output * 1000.0,
                cached_input: p.cached_input.unwrap_or(p.input) * 1000.0,
                cache_write: p.cache_write.unwrap_or(p.input) * 1000.0,
            };
            match &p.provider {
                Some(provider) => {
                    table
                        .by_provider_model
                        .insert((provider.clone(), p.model.clone()), rates);
                }
                None => {
                    table.by_model.insert(p.model.clone(), rates);
                }
            }
        }
        table
    }

    /// The cost of `usage` on `provider`'s `model`: uncached input, cache
    /// reads, cache writes and output each at their own price.
    pub fn cost(&self, provider: &str, model: &str, usage: &Usage) -> Cost {
        let Some(r) = self
            .by_provider_model
            .get(&(provider.to_owned(), model.to_owned()))
            .or_else(|| self.by_model.get(model))
        else {
            return Cost::default();
        };
        let cached = usage.cached_input_tokens.min(usage.input_tokens);
        let written = usage.cache_write_tokens.min(usage.input_tokens - cached);
        let uncached = usage.input_tokens - cached - written;
        let nanos = uncached as f64 * r.input
            + cached as f64 * r.cached_input
            + written as f64 * r.cache_write
            + usage.output_tokens as f64 * r.output;
        Cost {
            nanos: nanos.round().clamp(0.0, i64::MAX as f64) as i64,
            priced: true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn price(provider: Option<&str>, model: &str) -> AiPrice {
        AiPrice {
            provider: provider.map(str::to_owned),
            model: model.into(),
            input: 3.0,
            output: 15.0,
            cached_input: Some(0.3),
            cache_write: Some(3.75),
        }
    }

    #[test]
    fn cache_reads_and_writes_are_priced_apart_from_plain_input() {
        let prices = Prices::new(&[price(None, "claude")]);
        let usage = Usage {
            input_tokens: 1_000_000 + 2_000_000 + 100_000,
            cached_input_tokens: 2_000_000,
            cache_write_tokens: 100_000,
            output_tokens: 1_000_000,
            reasoning_tokens: 0,
        };
        let cost = prices.cost("anthropic", "claude", &usage);
        // 1M × $3 + 2M × $0.30 + 0.1M × $3.75 + 1M × $15
        assert!(cost.priced);
        assert_eq!(cost.nanos, 3_000_000_000 + 600_000_000 + 375_000_000 + 15_000_000_000);
    }

    #[test]
    fn a_provider_specific_price_wins_and_unknown_models_are_unpriced_not_free() {
        let mut cheap = price(Some("azure"), "gpt");
        cheap.input = 1.0;
        let prices = Prices::new(&[price(None, "gpt"), cheap]);
        let usage = Usage {
            input_tokens: 1000,
            ..Usage::default()
        };
        assert_eq!(prices.cost("azure", "gpt", &usage).nanos, 1_000_000);
        assert_eq!(prices.cost("openai", "gpt", &usage).nanos, 3_000_000);
        assert_eq!(
            prices.cost("openai", "other", &usage),
            Cost {
                nanos: 0,
                priced: false
            }
        );
    }
}
