package qupath.lib.measurements

/**
 * STAND-IN for QuPath's MeasurementList (not QuPath): name -> double, with the QuPath 0.4+
 * methods {@code containsKey}, {@code get}, {@code put}, {@code getNames}, {@code size}.
 */
class MeasurementList {
    private final LinkedHashMap<String, Double> values = new LinkedHashMap<String, Double>()

    boolean containsKey(String name) { return values.containsKey(name) }

    /** The value, or NaN when absent (as in QuPath). */
    double get(String name) { Double v = values.get(name); return v == null ? Double.NaN : v.doubleValue() }

    void put(String name, double value) { values.put(name, value) }

    List<String> getNames() { return new ArrayList<String>(values.keySet()) }

    /** Deprecated in QuPath 0.6 in favour of getNames(); kept for 0.4/0.5 scripts. */
    List<String> getMeasurementNames() { return getNames() }

    int size() { return values.size() }

    boolean isEmpty() { return values.isEmpty() }

    /** Stand-in only: the values as a map (QuPath 0.4+ offers PathObject.getMeasurements()). */
    Map<String, Double> asMap() { return new LinkedHashMap<String, Double>(values) }
}
