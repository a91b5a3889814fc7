package qupath.lib.io

import groovy.json.JsonSlurper
import qupath.lib.objects.PathObject
import standin.GeoJson

/**
 * STAND-IN for QuPath's PathIO (not QuPath): {@code readObjectsFromGeoJSON(InputStream)} as in
 * QuPath 0.4+: a Feature, a FeatureCollection or a JSON array of them; every object keeps its
 * GeoJSON "id".
 */
class PathIO {
    static List<PathObject> readObjectsFromGeoJSON(InputStream stream) throws IOException {
        Object json = GeoJson.normalise(new JsonSlurper().parse(new InputStreamReader(stream, 'UTF-8')))
        List<PathObject> out = []
        collect(json, out)
        return out
    }

    private static void collect(Object json, List<PathObject> out) {
        if (json instanceof List) {
            ((List) json).each { collect(it, out) }
        } else if (json instanceof Map) {
            Map m = (Map) json
            if (m.type == 'Feature')
                out << GeoJson.fromFeature(m)
            else if (m.type == 'FeatureCollection')
                ((List) m.features).each { collect(it, out) }
        }
    }
}
